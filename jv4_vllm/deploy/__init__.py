"""Deployment: the one source of vLLM arguments, starting processes on this machine
(``serve-adapter``, ``up``) and the Kubernetes manifests."""
