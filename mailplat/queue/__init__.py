"""The outbound queue: store, runner, relay to other hosts, bounces."""
