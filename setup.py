"""Packaging glue: the twistd plugin lives in ``twisted/plugins`` (no ``__init__.py``,
so it must be listed explicitly) and Twisted's dropin cache is regenerated after install
so that ``twistd --help`` lists ``kongtx`` straight away."""

from setuptools import find_packages, setup
from setuptools.command.install import install


class InstallAndRefreshPlugins(install):
    def run(self):
        install.run(self)
        try:
            from twisted.plugin import IPlugin, getPlugins

            list(getPlugins(IPlugin))
        except Exception as exc:  # the cache self-heals on the next twistd run
            print("note: could not refresh Twisted's plugin cache: %s" % (exc,))


setup(
    packages=find_packages(include=["kongtx", "kongtx.*"]) + ["twisted.plugins"],
    cmdclass={"install": InstallAndRefreshPlugins},
)
