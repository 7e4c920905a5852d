"""Developer tooling: a local Kubernetes control plane built from upstream sources (see ``cluster``)."""
