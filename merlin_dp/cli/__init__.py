"""The ``merlin-dp`` command line: ``main`` dispatches to a module per subcommand."""
