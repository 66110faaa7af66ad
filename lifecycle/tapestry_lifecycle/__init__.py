"""The round lifecycle, written once: what to do next, from what the store shows.

Pure decisions over observations, importable without kopf or torch. The Kopf operator
(Jobs in a cluster) and `tapestry local run` (subprocesses on a laptop) are two drivers
of the same functions, so what works locally works in a cluster.
"""
