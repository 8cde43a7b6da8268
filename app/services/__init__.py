"""Business logic behind the routes: uploads, validation, jobs. Routes only translate HTTP to these calls."""
