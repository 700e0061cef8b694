"""The ES core: noise, parameter groups, shaping, schedules, the update and the state hash.

Depends on torch alone, so it is testable without a network, a model hub or a coordinator.
"""
