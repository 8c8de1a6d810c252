"""The HTTP_JSON front: the server, the proxy's hot path, relayed responses, mirroring."""
