"""The contract every edge shares: the routing rule, the route table the gateway is handed,
and the model endpoint spec the API and the CRD validate. Pydantic, validated whole; the
gateway and the controller both import it, and it imports no other room."""
