"""The API's routes, one module per area. Routes are thin: the work is in the service."""
