"""Small trained policies: expert demos, object-state features, flow-matching behaviour cloning."""
