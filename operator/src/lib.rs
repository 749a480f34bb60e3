//! The TickPipeline operator (see issue 4).
