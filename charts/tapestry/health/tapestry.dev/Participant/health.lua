-- Argo CD health of a tapestry.dev Participant: where the member stands in its current
-- round. Healthy once the round is settled for it (merged, or its own failure, decline
-- or rejection reported: the state says which), Progressing while it answers, trains or
-- waits for the result, Suspended while a manually admitted round waits for approval.
-- >>> shared: the same in the health.lua of every tapestry.dev kind (a test checks it)
-- The operator's conditions decide, in kstatus's order: a status older than the spec
-- first, then Stalled=True (Degraded), Reconciling=True (Progressing), Ready=True
-- (Healthy); all three False is a hold, nothing to do and nothing wrong (Suspended,
-- which kstatus reads as InProgress).
-- Only the base and table libraries: Argo CD runs scripts from argocd-cm without the
-- string, math and os libraries (and strings have no methods there).
local function condition(status, kind)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

-- "<subject> <word>: <Reason>: <message>", leaving out a reason that repeats the word
-- or says nothing more (quiet).
local function describe(subject, word, c, quiet)
  local head = subject
  if word ~= nil and word ~= "" then
    head = head .. " " .. word
  end
  local parts = {}
  if c.reason ~= nil and c.reason ~= "" and c.reason ~= word and c.reason ~= quiet then
    table.insert(parts, c.reason)
  end
  if c.message ~= nil and c.message ~= "" then
    table.insert(parts, c.message)
  end
  if #parts == 0 then
    return head
  end
  return head .. ": " .. table.concat(parts, ": ")
end

local function assess(subject, word, idle, quiet)
  local status = obj.status
  local ready = condition(status, "Ready")
  if ready == nil then
    return {status = "Progressing", message = subject .. ": waiting for the operator's first status"}
  end
  local generation = obj.metadata.generation
  if generation ~= nil and status.observedGeneration ~= generation then
    local seen = "none"
    if status.observedGeneration ~= nil then
      seen = tostring(status.observedGeneration)
    end
    return {
      status = "Progressing",
      message = subject .. ": waiting for the operator to observe generation "
        .. tostring(generation) .. " (status is of generation " .. seen .. ")",
    }
  end
  local stalled = condition(status, "Stalled")
  if stalled ~= nil and stalled.status == "True" then
    return {status = "Degraded", message = describe(subject, word, stalled, quiet)}
  end
  local reconciling = condition(status, "Reconciling")
  if reconciling ~= nil and reconciling.status == "True" then
    return {status = "Progressing", message = describe(subject, word, reconciling, quiet)}
  end
  if ready.status == "True" then
    return {status = "Healthy", message = describe(subject, word, ready, quiet)}
  end
  return {status = "Suspended", message = idle or describe(subject, word, ready, quiet)}
end
-- <<< shared

local status = obj.status or {}
local subject = "Participant"
if status.currentRound ~= nil then
  subject = "Round " .. tostring(status.currentRound)
end
local idle = nil
local waiting = status.awaitingApproval
if waiting ~= nil and waiting.round ~= nil then
  local r = tostring(waiting.round)
  idle = "Round " .. r .. " awaits approval: add " .. r
    .. " to spec.admission.approvedRounds, or to deniedRounds to decline it"
end
return assess(subject, status.state, idle, nil)
