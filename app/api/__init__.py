"""The HTTP layer: the app factory, thin routes, response schemas, dependencies, middleware, and the table
from domain errors to HTTP statuses (`errors.STATUS`). Business rules live in `app.domain`."""
