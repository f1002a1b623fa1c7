-- Argo CD health of a federator.dev FederatedClient (argocd-cm: resource.customizations.health.federator.dev_FederatedClient).
-- Healthy once its silo joined the federation; Degraded on the Degraded condition (invalid spec, or the
-- server flagged its updates); Progressing while it waits for its Federation or to join.
local hs = {status = "Progressing", message = "waiting for the operator"}
if obj.status == nil then
  return hs
end
local st = obj.status
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and st.observedGeneration ~= nil and st.observedGeneration < generation then
  hs.message = "waiting for the operator to reconcile generation " .. tostring(generation)
  return hs
end
local ready = nil
if st.conditions ~= nil then
  for _, c in ipairs(st.conditions) do
    if c.type == "Degraded" and c.status == "True" then
      hs.status = "Degraded"
      hs.message = (c.reason or "Degraded") .. ": " .. (c.message or "")
      return hs
    end
    if c.type == "Ready" then
      ready = c
    end
  end
end
if st.flagged == true then
  hs.status = "Degraded"
  hs.message = "the server flagged this silo's updates"
  return hs
end
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or "joined"
  return hs
end
if ready ~= nil then
  hs.message = (ready.reason or "NotReady") .. ": " .. (ready.message or "")
end
return hs
