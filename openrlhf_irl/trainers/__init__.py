"""Trainers registered into OpenRLHF (see :mod:`openrlhf_irl.registry`)."""
