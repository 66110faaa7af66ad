"""The Tapestry operator: Federation, FederationRound and Participant, reconciled by Kopf.

Handlers are thin: they observe the store and the cluster, ask the round lifecycle
(`tapestry_lifecycle`) for the next step, and carry it out with objects built by the
pure functions in `builders`. The operator needs no torch.
"""
