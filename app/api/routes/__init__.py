"""One module per resource; each route translates HTTP to a service call and back."""
