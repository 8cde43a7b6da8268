"""One module per resource; each route translates HTTP to a domain call and back."""
