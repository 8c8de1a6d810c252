"""CaraML protocol buffers (``caraml.*`` proto packages) as Python stubs."""
