"""Installs supcon_tf; all metadata lives in setup.cfg."""

import setuptools

setuptools.setup()
