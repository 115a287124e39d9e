"""Routing: which models an atom is written to and which model answers queries. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from schemas.routing import EmbeddingRoute, EmbeddingRoutingConfig, RoutingPhase


@dataclass(frozen=True, slots=True)
class RouteSnapshot:
    """The routing one live batch runs under, taken after the batch was fetched."""

    query_model: str
    write_models: tuple[str, ...]
    phase: RoutingPhase = RoutingPhase.STABLE
    migration_id: str | None = None
    control_offset: int | None = None

    def route_new_atom(self) -> EmbeddingRoute:
        """The original design's question: where does a new atom go?"""
        primary, *rest = self.write_models
        return EmbeddingRoute(primary=primary, secondary=rest[0] if rest else None)

    def route_query(self) -> str:
        """The original design's question: which model answers a query?"""
        return self.query_model

    def routing_config(self) -> EmbeddingRoutingConfig:
        """The original design's full routing config."""
        return EmbeddingRoutingConfig(
            query_model=self.query_model, write_models=self.write_models, phase=self.phase
        )


def stable_snapshot(model: str) -> RouteSnapshot:
    """Routing with no migration: one model for writes and queries."""
    return RouteSnapshot(query_model=model, write_models=(model,))
