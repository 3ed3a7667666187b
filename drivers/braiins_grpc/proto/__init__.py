"""Generated from Braiins' `bos-plus-api` protocol buffers: see README.md here. Do not edit."""
