"""The shipped recipes, installed as package data of `mogao` (`mogao._recipes`); see `mogao.recipes`."""
