"""The web console: the mesh, training jobs, models and blueprints in a browser.

- `settings`: the console's environment (token, read-only access, agent names);
- `access`: tokens, sessions and CSRF tokens (pure);
- `forms`: the job and blueprint forms, read into the contracts' requests (pure);
- `views`: the contracts' messages as the data pages and the API show (pure);
- `clients`: the gRPC clients of the agents it shows;
- `feed`: the live NATS feed (agent, job, model events and alerts);
- `web`: the Starlette app (pages, JSON API, server-sent events);
- `service`: the agent (uvicorn on the agent runtime's event loop).
"""
