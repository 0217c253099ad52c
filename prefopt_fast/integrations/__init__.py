"""Trainer integrations (TRL, ...); importing prefopt_fast never imports them."""
