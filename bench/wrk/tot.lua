-- GET /tot for one credential, the same request on every connection.
--
--   wrk -t1 -c64 -d5s --latency -s bench/wrk/tot.lua http://127.0.0.1:PORT -- CRED
--
-- No `request` function: wrk builds the request once per thread (after
-- init has set the path) and replays the same bytes, so the load generator
-- spends nothing per request on Lua.  This is also what nginx's static 200
-- is measured with, so both sides of that ratio cost wrk the same.

init = function(args)
   wrk.method = "GET"
   wrk.path = "/tot?cred=" .. (args[1] or "bench-0")
end
