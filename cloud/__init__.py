"""cloud: the aggregator runtime and the `cloud-aggregator` command line."""
