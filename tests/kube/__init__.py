"""Real Kubernetes control plane, node agent and fixtures for the kube tests."""
