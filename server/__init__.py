"""The HTTP front end (installed as ``diffulex.server``): OpenAI protocol, routes, async engine client.

Empty until the server issue lands; the engine never imports from here.
"""
