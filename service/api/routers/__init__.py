"""HTTP routers, one per resource; thin: parse, call the domain, shape the response."""
