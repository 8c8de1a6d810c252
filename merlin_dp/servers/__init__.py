"""Model servers that ship with the project, each honouring the replica contract."""
