"""Services: one class per area of the business; dependencies are passed in."""
