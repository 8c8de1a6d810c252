"""Routing: the compiled route table, replica choice, and the sources tables come from."""
