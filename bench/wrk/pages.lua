-- Pages of 1000 (or LIMIT) items read over and over: GET /events?after=A
-- with A spread over the first COUNT events, or GET /past?cred=CRED&before=B
-- with B spread over CRED's first COUNT entries (the peer: a page of the
-- same size, read from LevelDB).
--
--   wrk -t1 -c16 -d5s --latency -s bench/wrk/pages.lua URL -- events COUNT LIMIT
--   wrk -t1 -c16 -d5s --latency -s bench/wrk/pages.lua URL -- past COUNT LIMIT CRED
--
-- The requests are formatted once, in init; `request` only picks the next.

init = function(args)
   local route = args[1] or "events"
   local count = tonumber(args[2] or "20000")
   local limit = tonumber(args[3] or "1000")
   local cred = args[4] or "bench-0"
   reqs = {}
   for i = 1, 1000 do
      local at = (i * 7919) % (count - limit)
      if route == "events" then
         reqs[i] = wrk.format("GET", "/events?after=" .. at .. "&limit=" .. limit)
      else
         reqs[i] = wrk.format("GET", "/past?cred=" .. cred .. "&limit=" .. limit
                                     .. "&before=" .. (at + limit + 1))
      end
   end
   turn = 0
end

request = function()
   turn = turn % 1000 + 1
   return reqs[turn]
end
