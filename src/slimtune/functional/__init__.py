"""Pure tensor math: slow, obviously right references beside the fast forms used by the layers."""
