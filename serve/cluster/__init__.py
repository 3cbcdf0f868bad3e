"""Ray Serve deployments and the application builder: the only package that imports ray."""
