-- PATCH /mod opening a new account on every request: a credential never
-- seen before, funded with `by=1`.  The worst case for the store: every mod
-- creates an account (a credential hash, a balance, a first history entry).
--
--   wrk -t1 -c64 -d5s --latency -s bench/wrk/mod_unique.lua URL -- PREFIX
--
-- PREFIX must differ between runs against the same data directory (the
-- driver passes one per run); each wrk thread adds its own number, so the
-- credentials stay unique with -t above 1 too.

local next_thread = 0

setup = function(thread)
   thread:set("thread_id", next_thread)
   next_thread = next_thread + 1
end

init = function(args)
   base = "/mod?cred=" .. (args[1] or "uniq-") .. (thread_id or 0) .. "-"
   n = 0
end

request = function()
   n = n + 1
   return wrk.format("PATCH", base .. n .. "&by=1")
end
