"""One module per push provider, each behind the small interface in :mod:`shared.providers.base`.

Dispatchers import only their own provider's module, so a function's cold start carries only its
own client library.
"""
