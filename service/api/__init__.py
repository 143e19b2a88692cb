"""HTTP only: parse requests, call the runtime, shape responses. No inference logic here."""
