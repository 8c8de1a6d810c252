"""The control plane: the `merlin-dp` command line now; the routing API and the source of
route tables arrive with the controller issue."""
