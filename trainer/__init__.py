"""Minimal PyTorch trainer that consumes packed, boundary-indexed data with varlen attention."""
