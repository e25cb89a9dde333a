"""waypoint: the L7 proxy of the mesh (Istio ambient's waypoint), in the same distribution as
the node agent. Its configuration model (VirtualService, DestinationRule, HTTPRoute, L7
AuthorizationPolicy) is `ztunnel.meshconfig`, shared with `ztunnel analyze`.
"""
