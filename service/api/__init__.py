"""REST only: parse requests, call admission and the data plane, shape responses. No inference
logic here; errors become HTTP statuses through service/errors.py."""
