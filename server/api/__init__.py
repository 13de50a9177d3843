"""HTTP layer: one APIRouter per concern, the app factory and its lifespan."""
