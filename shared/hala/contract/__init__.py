"""The contract every step relies on: recipes and stage specs, input keys and fingerprints, the store and its
manifests (the one cache predicate, commit, localize), content-addressed artifacts, leases, the step runtime,
the tables stages exchange, and the tiny stand-ins a `tiny:` input resolves to. Imports nothing of `hala.kit`
or `hala.ops` (a test checks)."""
