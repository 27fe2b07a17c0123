"""The `ambient` operator CLI and its kits (lab, bench, world, zds, conformance).

It sits on top of the services and is imported by none of them.
"""
