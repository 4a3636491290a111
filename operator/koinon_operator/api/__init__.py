"""API types of the koinon.dev/v1alpha1 resources, as plain typed Python."""
