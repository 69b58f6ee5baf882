"""Pipeline stages. Each subpackage is one stage: its logic, its dependency set (requirements.txt),
its metadata (stage.toml), its generated config schema and its README. Stages never import each
other; they share small functions from the common library `hala` (folder shared/hala/)."""
