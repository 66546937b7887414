"""The research lab: replay a real job trace through the production policy, in virtual time."""
