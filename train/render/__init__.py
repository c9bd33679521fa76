"""Blender rendering of training objects and the render launcher."""
