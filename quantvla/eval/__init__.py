"""LIBERO evaluation: protocols as data, the episode runner, success statistics and gates."""
