"""Pipeline stages: plain, versioned units that run with or without Ray."""
