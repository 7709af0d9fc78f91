-- Durable pairs over funded accounts PREFIX0 .. PREFIX(N-1): in "hold" mode
-- a hold of N, then its settle with all of it used; in "mod" mode, the peer,
-- a charge of N (min=0), then a refund of it.  Both modes make two durable
-- changes per pair and cost wrk the same: each reply is parsed in
-- `response`, which queues the pair's second request.
--
--   wrk -t1 -c64 -d5s --latency -s bench/wrk/hold_settle.lua URL -- PREFIX N MODE
--
-- wrk does not say which request a reply answers, so the account is read
-- from the reply's balance.  Account i is funded with a multiple of 2N plus
-- i.  A hold of N moves it by N, and a settle that uses all of it by 0, so
-- tot % N is i.  A charge moves it by -N and its refund back, so tot % 2N
-- is i + N after a charge and i after a refund.

init = function(args)
   prefix = args[1] or "bench-"
   n = tonumber(args[2] or "1000")
   mode = args[3] or "hold"
   turn = 0
   pending = {}
   head, tail = 1, 0
end

request = function()
   if head <= tail then
      local p = pending[head]
      pending[head] = nil
      head = head + 1
      if mode == "hold" then
         return wrk.format("PATCH", "/settle?cred=" .. prefix .. p[1] .. "&hold=" .. p[2]
                                    .. "&use=" .. n)
      end
      return wrk.format("PATCH", "/mod?cred=" .. prefix .. p[1] .. "&by=" .. n)
   end
   local i = turn
   turn = (turn + 1) % n
   if mode == "hold" then
      return wrk.format("PATCH", "/hold?cred=" .. prefix .. i .. "&by=-" .. n .. "&ttl=600")
   end
   return wrk.format("PATCH", "/mod?cred=" .. prefix .. i .. "&by=-" .. n .. "&min=0")
end

response = function(status, headers, body)
   if status ~= 200 then
      return
   end
   if mode == "hold" then
      local hold, tot = string.match(body, '^{"hold":(%d+),"tot":(%-?%d+)')
      if hold then
         tail = tail + 1
         pending[tail] = { math.floor(tonumber(tot) % n), hold }
      end
      return
   end
   local r = math.floor(tonumber(string.match(body, '^{"tot":(%-?%d+)')) % (2 * n))
   if r >= n then
      tail = tail + 1
      pending[tail] = { r - n }
   end
end
