"""The operations side, which no stage imports: the CLI, the scheduler and its executors (local runner,
compose, the Kubernetes conductor), gather, renderers, images, environments and locks, the run report."""
